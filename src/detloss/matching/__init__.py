"""detloss.matching"""
