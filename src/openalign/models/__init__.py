"""ALIGN towers: EfficientNet image encoder, BERT text encoder and the dual encoder that joins them."""
