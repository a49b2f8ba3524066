"""tfx: a TokenFLEX vision-language trainer (flexible visual-token counts, DeepSpeed ZeRO-3).

Importing `tfx` stays cheap: deepspeed, triton and transformers are imported by the modules
that need them. If transformers is already imported, `import tfx` registers the exported
TokenFLEX classes with its Auto classes at once; otherwise `import tfx.model` (which every
model-loading path does) registers them.
"""

import sys

__version__ = "0.1.0"

if "transformers" in sys.modules:
    import tfx.model  # noqa: F401  (registers the Auto classes)
