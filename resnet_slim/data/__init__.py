"""Data: from image files to prepared splits and batches.

`prepare` (duplicates, given or random splits, the prepared split files), `sources` (digits,
imagefolder and CIFAR-10 read as one raw dataset), `decode` (streamed decoding of image files in
worker processes), `pixels` (the image preprocessing and split file format, shared with serving),
`loader` (memory-mapped splits, augmented batches), `validate` (the Great Expectations suite).
"""
