"""MONAI Label infer tasks: one per SuPreM backbone, their ensemble, and the attention map."""
