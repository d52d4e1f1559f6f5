"""Weight conversion: Meta <-> neox <-> Hugging Face name maps (``names``), DeepSpeed checkpoint
files at any tensor/pipeline layout (``weights``), and the converters' shared options (``cli``).

Used by every tools/convert_* script, tools/reshard_checkpoint.py and generate.py; tensors are
cut and joined by the model's own parameter table (neox.model.layout).
"""
