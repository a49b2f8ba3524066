"""Registration of the exported TokenFLEX classes with transformers' Auto classes (on import).

Data flow position: export -> **Auto classes**. With tfx installed, `import tfx.model.hf` (or
`tfx.register_auto_classes()`) lets `AutoModelForImageTextToText`, `AutoProcessor` and
`AutoImageProcessor` load a `model_type: tokenflex` folder without `trust_remote_code`; without
tfx, the folder's own code does the same through its `auto_map`s.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from tfx.model.configuration_tokenflex import TokenFlexConfig, TokenFlexEfficientNetConfig
from tfx.model.modeling_tokenflex import TokenFlexForConditionalGeneration
from tfx.model.processing_tokenflex import TokenFlexImageProcessor, TokenFlexProcessor

AutoConfig.register(TokenFlexConfig.model_type, TokenFlexConfig, exist_ok=True)
AutoConfig.register(TokenFlexEfficientNetConfig.model_type, TokenFlexEfficientNetConfig,
                    exist_ok=True)
for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
    auto.register(TokenFlexConfig, TokenFlexForConditionalGeneration, exist_ok=True)
AutoProcessor.register(TokenFlexConfig, TokenFlexProcessor, exist_ok=True)
try:  # transformers before 5.2x wants torchvision for AutoImageProcessor itself
    AutoImageProcessor.register(TokenFlexConfig,
                                slow_image_processor_class=TokenFlexImageProcessor,
                                exist_ok=True)
except ImportError:
    pass
