"""Text: the tokenizer, incremental detokenising and stop strings, the chat template and Qwen3's reasoning split."""
