"""The zero fine-tuning object encoder (Taming Encoder): model.py (the encoder and its file), encode.py (a concept in
one forward pass), pretrain.py (its one-time training, on accelerate)."""
