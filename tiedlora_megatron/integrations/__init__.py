"""Tied-LoRA in other training frameworks' PEFT protocols (`bridge`: Megatron-Bridge, NeMo 2).

Each integration imports its framework lazily, so none of them is a dependency of this package.
"""
