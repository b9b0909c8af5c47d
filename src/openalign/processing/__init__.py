"""From files and arrays to model inputs: image loading, image transforms, tokenizer, processor."""
