"""The network, stage by stage, as pure MLX: `config` (hyper-parameters from the checkpoint), `encoder` (SAN-M),
`adaptor`, `llm` (mlx-lm's Qwen3 wiring), `prompt` (ChatML through the tokenizer), `ctc` (the CTC head and
forced alignment), `network` (the module tree holding every weight). Nothing here asks which device it runs on."""
