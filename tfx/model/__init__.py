"""Model: vision tower -> token-adaptive projector(N) -> causal LM. Plain nn.Modules, no DeepSpeed.

Importing this package registers the exported model (`model_type: tokenflex`) with the
transformers Auto classes, so `AutoModelForImageTextToText.from_pretrained(folder)` works
without `trust_remote_code`.
"""


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from tfx.model.configuration_tokenflex import TokenFlexConfig
    from tfx.model.modeling_tokenflex import TokenFlexForConditionalGeneration

    AutoConfig.register(TokenFlexConfig.model_type, TokenFlexConfig, exist_ok=True)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        auto.register(TokenFlexConfig, TokenFlexForConditionalGeneration, exist_ok=True)


register_auto_classes()
