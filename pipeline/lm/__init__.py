"""The language-model side: building the causal LM, the vocabulary and sequence layout, the ARRA
objective around it, the text tokenizer, and generation with its sampling settings."""
