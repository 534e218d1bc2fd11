"""fuseloop: the code both sides share.

The inference and feedback services (`services/`) and the trainer (`trainer/`) import
event schemas, preprocessing, the model, the model-repository format and config from
here, and only from here, so training and serving cannot drift apart.
"""

__version__ = "0.1.0"
