"""The offline trainer: components (data, losses, reward model, policy gradient, gate, publish)
and one recipe per job (`pretrain`, `round`) that wires them."""
