"""Zero-shot classification and image-text retrieval for anything with encode_image/encode_text."""
