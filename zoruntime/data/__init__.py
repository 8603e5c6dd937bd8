"""Data for training without the network: a byte-level tokenizer, a generated corpus, the causal-LM
task, and SST-2 with MeZO's prompt and candidate scoring."""
