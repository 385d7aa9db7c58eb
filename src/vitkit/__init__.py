"""vitkit: train, explain, attack and certify Vision Transformers."""

from vitkit.errors import VitkitError
from vitkit.models import ViTConfig, VisionTransformer, create_model

__version__ = "0.1.0"
__all__ = ["VitkitError", "ViTConfig", "VisionTransformer", "create_model", "__version__"]
