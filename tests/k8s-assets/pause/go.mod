module github.com/waldur/waldur-operator/tests/k8s-assets/pause

go 1.26.0
