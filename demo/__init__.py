"""The closed-loop demo: simulated users playing product apps against the real services, and
rounds of train -> gate -> redeploy. It wires `services/` and `trainer/` together."""
