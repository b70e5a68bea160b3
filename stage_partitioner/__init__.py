"""Outer pass: layer clustering, submesh enumeration, stage cost tables, the inter-op dynamic
program and the step-time simulator. Imports the foundations and `intra_op`."""
