"""MONAI Label train tasks that fine-tune the SuPreM backbones on revised labels."""
