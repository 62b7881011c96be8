"""detloss.detectors"""
