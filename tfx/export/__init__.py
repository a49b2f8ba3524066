"""Export: a training checkpoint -> a Hugging Face folder (`tfx convert`), and inference on
either (`tfx generate`)."""
