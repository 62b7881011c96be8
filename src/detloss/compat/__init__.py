"""detloss.compat"""
