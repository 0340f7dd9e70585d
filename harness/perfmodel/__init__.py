"""The performance model: testbeds as data (testbed.py), and what a trial costs on one."""
