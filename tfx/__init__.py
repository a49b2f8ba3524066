"""tfx: a TokenFLEX vision-language trainer (flexible visual-token counts, DeepSpeed ZeRO-3).

Importing `tfx` stays cheap: deepspeed, triton and transformers are imported by the modules
that need them. The exported TokenFLEX classes are registered with transformers' Auto classes
(so an export loads without `trust_remote_code`) by `tfx.register_auto_classes()`, by
importing `tfx.model.hf`, or by `import tfx` itself when transformers is already imported.
"""

import sys

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """AutoConfig, AutoModelForImageTextToText, AutoModelForCausalLM, AutoProcessor and
    AutoImageProcessor learn `model_type: tokenflex` (imports transformers)."""
    from tfx.model import hf  # noqa: F401  (registers on import)


if "transformers" in sys.modules:
    register_auto_classes()
