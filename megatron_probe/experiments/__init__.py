"""Experiment harnesses: the shipped tiny model, routing recorder and workload replay, the scaled
replay regime, the equivalence check and the cost-model calibration."""
