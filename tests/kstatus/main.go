// kstatus-of computes what kstatus (sigs.k8s.io/cli-utils/pkg/kstatus, the library behind
// Flux's health checks and `kpt live status`) says of each object it is given.
//
//	kstatus-of < objects.json
//
// Input: a JSON array of Kubernetes objects. Output: one JSON line per object,
// {"name": ..., "status": "Current|InProgress|Failed|...", "message": ...}.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus-of: reading a JSON array of objects: %v\n", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, object := range objects {
		u := &unstructured.Unstructured{}
		// UnmarshalJSON keeps integers as int64, which kstatus's accessors expect.
		if err := u.UnmarshalJSON(object); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus-of: not a Kubernetes object: %v\n", err)
			os.Exit(2)
		}
		res, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus-of: %s: %v\n", u.GetName(), err)
			os.Exit(1)
		}
		if err := out.Encode(result{Name: u.GetName(), Status: res.Status.String(), Message: res.Message}); err != nil {
			os.Exit(1)
		}
	}
}
