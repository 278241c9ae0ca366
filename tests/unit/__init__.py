# A package, so that these modules (unit.test_finetune, ...) do not clash with tests/integration's modules of the same
# names, which stay top-level: test_lora.py imports test_finetune by name, which --import-mode=importlib would break.
