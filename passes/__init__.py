"""legoc.passes"""
