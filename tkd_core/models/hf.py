"""Hugging Face BERT-family folders in and out of `TransformerClassifier` (issue 10):
load_pretrained and save_pretrained land here."""
