"""The example pipeline as a YAML component (``defs/review_sentiment/defs.yaml``).

Load it with ``dagster dev -m example_project.components_example.definitions`` (or
``dg dev`` from this folder). ``defs/reviews.py`` is the upstream asset and
``defs/resources.py`` supplies the ``infron`` resource the component's assets need.
"""
