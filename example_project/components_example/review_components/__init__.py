"""The example pipeline as YAML components, in a dg project of its own.

``defs/review_sentiment/defs.yaml`` is the pipeline, ``defs/infron/defs.yaml`` the resource
(key from ``INFRON_API_KEY``, embedded server unless ``INFRON_BASE_URL`` is set) and
``defs/reviews.py`` the upstream asset. From ``example_project/components_example``:
``dg check defs``, ``dg list defs`` or ``dg dev``.
"""
