"""Test fixtures shipped with the package (pyroute2's habit): image builders, scratch dirs.

Importing these modules has no side effects; each helper does its work only when called.
"""
