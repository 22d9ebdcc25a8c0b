"""vlmtune: LoRA / QLoRA fine-tuning of LLMs and VLMs on Accelerate and PEFT.

Importing this package is cheap: it creates no Accelerator, touches no GPU and does not import bitsandbytes.
"""

__version__ = "0.1.0"
