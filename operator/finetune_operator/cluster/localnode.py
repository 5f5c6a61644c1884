"""placeholder"""
class LocalNode: pass
