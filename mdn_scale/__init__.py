"""mdn_scale: model, data and training for MDN language models."""
