"""Data preparation and loading, in the order data flows (ARCHITECTURE §4):

synthetic.py / import_folder.py  raw shards: shapes data, or an image folder + metadata (DiffSynth format)
phase.py (+ buckets.py, images.py) create-phase: every image resized into its bucket, re-encoded
index.py                          create-indices: bucket -> global row ids, with a manifest of the folder
sampler.py                        which rows each loader reads at each step (deterministic, resumable)
batches.py (+ shards.py, captions.py) those rows decoded into a RawBatch; bad rows skipped and counted
"""
