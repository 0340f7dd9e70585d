"""fsmoe_native: an FSMoE-style scheduled MoE built on tutel_native's layer (see layer.py)."""
