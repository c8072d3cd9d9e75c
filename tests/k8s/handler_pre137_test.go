//go:build !k8s137

package k8s

// The kubelet's plugin handler interface before 1.37 (no context argument): the
// recording wrapper's methods for lanes 1.34 and 1.36.

import "time"

func (h *recordingHandler) ValidatePlugin(name, endpoint string, versions []string) error {
	err := h.inner.ValidatePlugin(name, endpoint, versions)
	h.add(regEvent{op: "validate", name: name, endpoint: endpoint, versions: versions, err: err})
	return err
}

func (h *recordingHandler) RegisterPlugin(name, endpoint string, versions []string, timeout *time.Duration) error {
	err := h.inner.RegisterPlugin(name, endpoint, versions, timeout)
	h.add(regEvent{op: "register", name: name, endpoint: endpoint, versions: versions, err: err})
	return err
}

func (h *recordingHandler) DeRegisterPlugin(name, endpoint string) {
	h.inner.DeRegisterPlugin(name, endpoint)
	h.add(regEvent{op: "deregister", name: name, endpoint: endpoint})
}
