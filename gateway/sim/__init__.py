"""Simulation, calibration and reports: the gateway's dispatch over emulated pools in virtual
time (:mod:`.run`), the workloads it is driven by, the statistics and economics it measures
with, and the ``simulate``/``calibrate``/``report`` commands' library code.
"""
