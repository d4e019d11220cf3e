"""`python -m tiedlora_megatron.finetune` (also the `tiedlora-finetune` console script)."""

from tiedlora_megatron.finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
