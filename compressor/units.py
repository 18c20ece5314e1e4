"""The units atc's figures are in, said once: the counting step and the report's views both name them."""

MAC_UNIT = "GMACs (fvcore: one multiply-add counted as one flop; GFLOPs = 2 x GMACs; BatchNorm and pooling included)"

REPORT_UNITS = {"gmacs": "fvcore multiply-adds, one multiply-add = one flop; GFLOPs = 2 x GMACs", "latency": "milliseconds"}
