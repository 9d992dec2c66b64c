"""The sweep pipeline: plan, train, time, budget, distributed launch."""
