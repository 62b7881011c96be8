"""detloss.sampling"""
