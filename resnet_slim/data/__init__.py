"""Data: from image files to prepared splits and batches.

`prepare` (sources, given or random splits, streamed decoding, the prepared split files),
`pixels` (the image preprocessing and split file format, shared with serving), `loader`
(memory-mapped splits, augmented batches), `validate` (the Great Expectations suite).
"""
