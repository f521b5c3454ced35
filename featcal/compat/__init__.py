"""Drop-in backends for front ends written against other FeatCal implementations.

`featcal.compat.official`: the two calibration functions of the published reference code.
"""
