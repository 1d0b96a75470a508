"""Simulation support that needs no gateway: workloads, statistics and economics.

The simulation driver itself (:mod:`gateway.sim`) runs the gateway's dispatch over emulated
pools in virtual time; these modules are what it measures with.
"""
