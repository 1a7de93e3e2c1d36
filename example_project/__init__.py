"""An example daily pipeline: product reviews classified and embedded through batch inference."""
