"""Files in and out: the Hugging Face format (hf_format.py) and safetensors files
(safetensors.py), which know files and not models; Orbax checkpoints and exports
(checkpoint.py); `from_pretrained` for every saved model (pretrained.py); the streaming converter
between the two formats (convert.py).

This package imports none of its modules here: config.py reads hf_format.py, below everything
else."""
