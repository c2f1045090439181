"""Text: the offline CLIP tokenizer, new trigger words and their vectors, prompt templates."""
