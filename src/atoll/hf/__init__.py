"""atoll's Llama and Hugging Face transformers: the mapping between them and tokenizer files."""
