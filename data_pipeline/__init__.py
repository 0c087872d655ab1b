"""Data pipeline: raw text -> sentencepiece tokens -> webdataset shards -> packed, exactly resumable batches.

Modules (each runnable one with `python -m data_pipeline.<name>`):
  tokenizer  train a sentencepiece model + JSON card (CLI)
  prepare    tokenize text into webdataset shards + manifest + validation split (CLI)
  corpus     materialise the bundled Jane Austen corpus as text files (CLI)
  dataset    PackedTokenDataset, the torch IterableDataset over a manifest

The package itself imports nothing heavy; import torch-using modules explicitly.
"""
