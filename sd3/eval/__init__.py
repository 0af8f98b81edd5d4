"""Looking at a model: validation during training, FID and CLIP score (`sd3 eval`), the hub export (`sd3 export`).

This package comes after sd3.train and sd3.sample in the import order (it samples with the pipeline's samplers and
reads the trainer's EMA), so the Trainer never imports it: `sd3 train` builds a Validator and hands it over.
"""
